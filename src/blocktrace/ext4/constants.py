"""ext4 and JBD2 constants, with the kernel's names (fs/ext4/ext4.h, include/linux/jbd2.h).

Kept apart from parsing (pyelftools' ``constants.py`` pattern) so that grep finds the same name
in the kernel, in e2fsprogs and here.  ext4 is little-endian; JBD2 is big-endian.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

EXT4_SUPER_MAGIC = 0xEF53
EXT4_SUPERBLOCK_OFFSET = 1024  #: the primary superblock always starts at byte 1024
EXT4_SUPERBLOCK_SIZE = 1024
EXT4_EXT_MAGIC = 0xF30A  #: extent tree node header magic
EXT4_N_BLOCKS = 15  #: i_block[] slots (60 bytes)
EXT4_NDIR_BLOCKS = 12
EXT4_IND_BLOCK = 12
EXT4_DIND_BLOCK = 13
EXT4_TIND_BLOCK = 14
EXT4_ROOT_INO = 2
EXT4_GOOD_OLD_FIRST_INO = 11
EXT4_GOOD_OLD_INODE_SIZE = 128
EXT4_MIN_DESC_SIZE = 32
EXT4_MIN_DESC_SIZE_64BIT = 64
EXT4_XATTR_MAGIC = 0xEA020000
EXT4_EXT_INIT_MAX_LEN = 1 << 15  #: ee_len above this marks an unwritten extent


class FeatureCompat(IntFlag):
    DIR_PREALLOC = 0x1
    IMAGIC_INODES = 0x2
    HAS_JOURNAL = 0x4
    EXT_ATTR = 0x8
    RESIZE_INODE = 0x10
    DIR_INDEX = 0x20
    SPARSE_SUPER2 = 0x200
    FAST_COMMIT = 0x400
    STABLE_INODES = 0x800


class FeatureIncompat(IntFlag):
    COMPRESSION = 0x1
    FILETYPE = 0x2
    RECOVER = 0x4
    JOURNAL_DEV = 0x8
    META_BG = 0x10
    EXTENTS = 0x40
    BIT64 = 0x80  #: INCOMPAT_64BIT
    MMP = 0x100
    FLEX_BG = 0x200
    EA_INODE = 0x400
    DIRDATA = 0x1000
    CSUM_SEED = 0x2000
    LARGEDIR = 0x4000
    INLINE_DATA = 0x8000
    ENCRYPT = 0x10000
    CASEFOLD = 0x20000


class FeatureRoCompat(IntFlag):
    SPARSE_SUPER = 0x1
    LARGE_FILE = 0x2
    BTREE_DIR = 0x4
    HUGE_FILE = 0x8
    GDT_CSUM = 0x10
    DIR_NLINK = 0x20
    EXTRA_ISIZE = 0x40
    QUOTA = 0x100
    BIGALLOC = 0x200
    METADATA_CSUM = 0x400
    READONLY = 0x1000
    PROJECT = 0x2000
    VERITY = 0x8000
    ORPHAN_PRESENT = 0x10000


#: incompat features the model understands; anything else makes open() fail with a FormatError
SUPPORTED_INCOMPAT = (
    FeatureIncompat.FILETYPE
    | FeatureIncompat.RECOVER
    | FeatureIncompat.EXTENTS
    | FeatureIncompat.BIT64
    | FeatureIncompat.MMP
    | FeatureIncompat.FLEX_BG
    | FeatureIncompat.CSUM_SEED
    | FeatureIncompat.LARGEDIR
    | FeatureIncompat.EA_INODE
    | FeatureIncompat.ENCRYPT  # names are ciphertext bytes: reported as such
    | FeatureIncompat.CASEFOLD  # entries may carry a hash after the name: ignored
)


class InodeFlags(IntFlag):
    SECRM = 0x1
    IMMUTABLE = 0x10
    APPEND = 0x20
    INDEX = 0x1000  #: EXT4_INDEX_FL: hashed (htree) directory
    HUGE_FILE = 0x40000
    EXTENTS = 0x80000
    EA_INODE = 0x200000
    INLINE_DATA = 0x10000000


# i_mode file types (S_IFMT bits)
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000


class FileType(IntEnum):
    """Directory entry file_type (EXT4_FT_*)."""

    UNKNOWN = 0
    REG_FILE = 1
    DIR = 2
    CHRDEV = 3
    BLKDEV = 4
    FIFO = 5
    SOCK = 6
    SYMLINK = 7


EXT4_FT_DIR_CSUM = 0xDE  #: file_type of the metadata_csum dirent tail


# ---- JBD2 (big-endian on disk) ----
JBD2_MAGIC_NUMBER = 0xC03B3998


class JBD2BlockType(IntEnum):
    DESCRIPTOR_BLOCK = 1
    COMMIT_BLOCK = 2
    SUPERBLOCK_V1 = 3
    SUPERBLOCK_V2 = 4
    REVOKE_BLOCK = 5
    FC_BLOCK = 6  #: fast-commit area block (not parsed)


class JBD2FeatureCompat(IntFlag):
    CHECKSUM = 0x1


class JBD2FeatureIncompat(IntFlag):
    REVOKE = 0x1
    BIT64 = 0x2  #: JBD2_FEATURE_INCOMPAT_64BIT
    ASYNC_COMMIT = 0x4
    CSUM_V2 = 0x8
    CSUM_V3 = 0x10
    FAST_COMMIT = 0x20


class JBD2TagFlags(IntFlag):
    ESCAPE = 0x1  #: the logged copy had the JBD2 magic in its first 4 bytes, zeroed
    SAME_UUID = 0x2  #: no 16-byte UUID follows the tag
    DELETED = 0x4
    LAST_TAG = 0x8

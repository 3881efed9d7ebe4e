"""Serving one request of an NBD connection: the device call and its reply.

A request validated by :func:`~.transmission.validate_request` becomes one call of the
export's device, driven with ``coro.send(None)``: local devices usually finish without
suspending and the reply joins the receive's batch at once (a small READ without any budget
accounting, the hot path); a call that suspends finishes in a Task
(:class:`~.dispatch.Resume`).  Replies gathered while parsing one receive are written together.
The hot-path choices are explained in :mod:`.connection`.
"""

from __future__ import annotations

import errno as E
from collections.abc import Coroutine
from typing import Any

from blocktrace.block.device import Extent
from blocktrace.errors import BlockDeviceError
from blocktrace.nbd import transmission as tx
from blocktrace.nbd.connbase import (
    _CACHE,
    _DISC,
    _DONE,
    _FAST_ZERO,
    _FLUSH,
    _FUA,
    _JOIN_LIMIT,
    _NO_HOLE,
    _OFFSET_DATA,
    _READ,
    _READ_UNRESERVED,
    _REQ_ONE,
    _SIMPLE_MAGIC,
    _STATUS,
    _STRUCTURED_MAGIC,
    _TRIM,
    _WRITE,
    _ZERO,
    ConnectionBase,
    _pack_data_header,
    _pack_simple,
    log,
)
from blocktrace.nbd.dispatch import Resume, block_status
from blocktrace.nbd.errors import NBDRequestError
from blocktrace.nbd.events import (
    Request,
)


class Serving(ConnectionBase):
    """Requests to the device and replies to the client, for one connection."""

    def _request(self, req: Request, *, pin: bool, own: int = 0) -> bool | None:
        """Validate and start one request: True if it finished synchronously, False if it
        suspended (a Task finishes it), None if it is a READ that must wait for payload
        budget (nothing was done; the caller parses it again later).

        ``pin``: ``req.data`` is a view of the receive buffer.  ``own``: budget bytes a large
        WRITE's own payload buffer holds; a suspended request gives them back when it ends,
        a synchronous one leaves that to the caller (who may keep the buffer as its spare).
        """
        session = self._session
        device = self._device
        assert session is not None and device is not None
        cmd, flags, cookie, offset, length, data = req
        try:
            tx.validate_request(session, cmd, flags, offset, length)
        except NBDRequestError as exc:
            self.requests += 1
            log.debug("connection %d: %s", self.id, exc)
            self._send(tx.encode_error(session, cookie, cmd, exc.errno, str(exc)))
            return True
        coro: Coroutine[Any, Any, Any]
        reserved = 0  # budget a READ holds for its data until the reply leaves
        if cmd == _READ:
            if length > _READ_UNRESERVED:
                if not self._budget.try_reserve(length):
                    self._wait_for_budget()
                    return None
                reserved = length
            coro = device.read(offset, length)
        elif cmd == _WRITE:
            if data is None:  # oversized: validate_request refused it above
                raise AssertionError("oversized write passed validation")
            coro = device.write(offset, data, fua=bool(flags & _FUA))
        elif cmd == _FLUSH:
            coro = device.flush()
        elif cmd == _TRIM:
            coro = device.trim(offset, length, fua=bool(flags & _FUA))
        elif cmd == _ZERO:
            coro = device.write_zeroes(
                offset,
                length,
                may_trim=not flags & _NO_HOLE,
                fua=bool(flags & _FUA),
                fast=bool(flags & _FAST_ZERO),
            )
        elif cmd == _STATUS:
            coro = block_status(device, offset, length, bool(flags & _REQ_ONE))
        elif cmd == _CACHE:
            coro = device.cache(offset, length)
        elif cmd == _DISC:
            self.requests += 1
            self._stopping = True
            self._maybe_finished()
            return True
        else:  # pragma: no cover - validate_request refuses unknown commands
            raise AssertionError(f"unhandled command {cmd}")
        self.requests += 1
        try:
            fut = coro.send(None)
        except StopIteration as stop:
            batch = self._batch
            if cmd == _READ and not reserved and batch is not None:
                # The hot path, a small READ answered while parsing: its reply joins the
                # batch with no budget to account (what _complete and _send_data do).
                result = stop.value
                batch.append(
                    _pack_data_header(
                        _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset
                    )
                    if session.structured
                    else _pack_simple(_SIMPLE_MAGIC, 0, cookie)
                )
                batch.append(result)
                self._batch_bytes += len(result)
                return True
            self._complete(cmd, flags, cookie, offset, length, stop.value, reserved)
            return True
        except BlockDeviceError as exc:
            self._fail(cmd, cookie, exc.errno, str(exc), reserved)
            return True
        except Exception as exc:
            log.exception("connection %d: %s failed", self.id, tx.cmd_name(cmd))
            self._fail(cmd, cookie, E.EIO, str(exc), reserved)
            return True
        # The device suspended: finish in a Task (keeping the receive buffer pinned if the
        # device holds a view of it).
        self._inflight += 1
        if pin:
            self._pins += 1
        self._held += own  # a large payload's own buffer, held until the request finishes
        assert self._loop is not None
        task = self._loop.create_task(
            self._finish(
                coro,
                fut,
                cmd,
                flags,
                cookie,
                offset,
                length,
                self._buf if pin else None,
                own,
                reserved,
            )
        )
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)
        return False

    async def _finish(
        self,
        coro: Coroutine[Any, Any, Any],
        fut: Any,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        pinned: bytearray | None,
        own: int,
        reserved: int,
    ) -> None:
        try:
            result = await Resume(coro, fut)
        except BlockDeviceError as exc:
            self._fail(cmd, cookie, exc.errno, str(exc), reserved)
        except Exception as exc:
            log.exception("connection %d: %s failed", self.id, tx.cmd_name(cmd))
            self._fail(cmd, cookie, E.EIO, str(exc), reserved)
        else:
            self._complete(cmd, flags, cookie, offset, length, result, reserved)
        finally:
            if pinned is not None:
                self._unpin(pinned)
            self._held -= own
            self._budget.release(own)
            self._inflight -= 1
            self._update_reading()
            if not self._maybe_finished():
                self._safe(self._process)

    def _unpin(self, buf: bytearray) -> None:
        if buf is self._buf:
            self._pins -= 1
            return
        key = id(buf)
        left = self._retired[key] - 1
        if left:
            self._retired[key] = left
        else:
            del self._retired[key]
            self._held -= len(buf)

    def _complete(
        self,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        result: Any,
        reserved: int = 0,
    ) -> None:
        session = self._session
        assert session is not None
        if cmd == _READ:
            header = tx.encode_read_header(session, cookie, offset, length)
            self._send_data(header, result, reserved)
        elif cmd == _STATUS:
            extents: list[Extent] = result
            desc = tx.block_status_descriptors(extents, length, bool(flags & _REQ_ONE))
            self._send(tx.encode_block_status(session, cookie, desc))
        else:
            self._send(_pack_simple(_SIMPLE_MAGIC, 0, cookie))

    def _fail(self, cmd: int, cookie: int, errno: int, message: str, reserved: int = 0) -> None:
        session = self._session
        assert session is not None
        self._budget.release(reserved)
        log.debug("connection %d: %s: %s", self.id, tx.cmd_name(cmd), message)
        self._send(tx.encode_error(session, cookie, cmd, errno, message))

    # -- sending -------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
            self._batch_bytes += len(data)
        elif not self._closed and self.transport is not None:
            self.transport.write(data)

    def _send_data(self, header: bytes, data: Any, reserved: int) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(header)
            batch.append(data)
            self._batch_bytes += len(data)
            self._reads_batched += reserved
            return
        t = self.transport
        if self._closed or t is None:
            self._budget.release(reserved)
            return
        if self._writelines:
            t.writelines((header, data))
        elif len(data) < _JOIN_LIMIT:
            t.write(header + data)
        else:
            t.write(header)
            t.write(data)
        self._sent_reads(reserved)

    def _sent_reads(self, reserved: int) -> None:
        """READ data of ``reserved`` budget bytes went to the transport: if the client is
        not reading (the transport paused), it stays counted until the transport drains."""
        if self._write_paused and not self._closed:
            self._tx_held += reserved
        else:
            self._budget.release(reserved)

    def _flush_batch(self) -> None:
        """Write the replies gathered while parsing: one writev on uvloop."""
        batch, self._batch = self._batch, None
        reads, self._reads_batched = self._reads_batched, 0
        t = self.transport
        if not batch or self._closed or t is None:
            self._batch_bytes = 0
            self._budget.release(reads)
            return
        if len(batch) == 1:
            t.write(batch[0])
        elif self._writelines:
            t.writelines(batch)
        elif self._batch_bytes < _JOIN_LIMIT:
            t.write(b"".join(batch))
        else:
            for item in batch:
                t.write(item)
        self._batch_bytes = 0
        self._sent_reads(reads)

"""The NBD protocol: sans-IO cores (handshake, transmission) and the asyncio server adapter."""

"""The bundled emulator of the reviews API: answers as the contract says, with limits and faults."""

from crawler.sandbox.app import FAULT_KINDS, Sandbox, SandboxOptions, key_fingerprint, serve
from crawler.sandbox.catalogue import Catalogue
from crawler.sandbox.process import SandboxProcess, serve_in_process

__all__ = [
    "FAULT_KINDS",
    "Catalogue",
    "Sandbox",
    "SandboxOptions",
    "SandboxProcess",
    "key_fingerprint",
    "serve",
    "serve_in_process",
]

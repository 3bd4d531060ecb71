"""The bundled emulator of the reviews API: answers as the contract says, with limits and faults."""

from crawler.sandbox.app import FAULT_KINDS, Sandbox, SandboxOptions, key_fingerprint, serve
from crawler.sandbox.catalogue import Catalogue

__all__ = ["FAULT_KINDS", "Catalogue", "Sandbox", "SandboxOptions", "key_fingerprint", "serve"]

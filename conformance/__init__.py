"""Layer-by-layer conformance harness for ports of keras-hub's ``PaliGemmaBackbone``.

    python -m conformance check --backend refimpl            # or: paligemma-ref check ...
    python -m conformance check --candidate my_port_dumps/   # .npz / .h5 files of named taps, one per case

A backend (``conformance.backend``) is prepared once per golden case, run on the case's inputs, and its taps are
compared with the case's float64 reference taps in forward order (``conformance.harness``) using the one tolerance
table (``conformance.tolerances``). Reports (``conformance.report``) lead with the first tap over tolerance and say
whether its error was inherited from the tap upstream of it or introduced there.
"""

from conformance.backend import (Backend, BackendUnavailable, Capabilities, DumpBackend, KerasHubBackend,
                                 RecordedKerasBackend, RefimplBackend, make_backend)
from conformance.cases import Case, CaseError, IntegrityError, SchemaError, list_cases, load_case
from conformance.harness import CaseResult, CheckOptions, check_case, check_cases

__all__ = [
    "Backend", "BackendUnavailable", "Capabilities", "Case", "CaseError", "CaseResult", "CheckOptions",
    "DumpBackend", "IntegrityError", "KerasHubBackend", "RecordedKerasBackend", "RefimplBackend", "SchemaError", "check_case",
    "check_cases", "list_cases", "load_case", "make_backend",
]

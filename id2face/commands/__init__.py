"""One module per `id2face` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``.

Modules import heavy libraries inside ``run`` only, so ``id2face --help`` and ``id2face X --help``
stay fast.
"""


def resolve_device(name: str | None, flag: str = "--device"):
    """``--device`` (or another ``flag``) -> torch.device; None or "auto": cuda if available, else
    cpu. A name torch does not know, or cuda without a GPU, is a one-line UserError."""
    import torch

    from ..errors import UserError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: no CUDA device is available")
    return device

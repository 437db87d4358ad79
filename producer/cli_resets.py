"""CLI commands of the reset flow: request, confirm, status, cancel, demo."""


def add_commands(sub) -> None:
    return None

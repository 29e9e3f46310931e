"""The small family of named errors the edges (CLI, HTTP) turn into user messages.

Each error carries a Spanish message for students/teachers, an English one for logs and admins,
and the command or action that fixes it (`fix`, English; `solucion`, the same in Spanish where a
teacher may read it: what stops `serve` before its status page can say it).
"""

from __future__ import annotations


class PulmoMedError(Exception):
    """Base class: a fault we expected and can explain."""

    def __init__(self, mensaje: str, message: str, fix: str = "", solucion: str = "") -> None:
        super().__init__(message)
        self.mensaje = mensaje
        self.message = message
        self.fix = fix
        self.solucion = solucion

    def __str__(self) -> str:
        text = f"{self.message} / {self.mensaje}"
        return f"{text} — fix: {self.fix}" if self.fix else text


class ModelError(PulmoMedError):
    """A model file is missing, truncated, unverified or failed to load."""


class KnowledgeIndexError(PulmoMedError):
    """The knowledge index is missing, corrupt or built for another encoder."""


class CorpusError(PulmoMedError):
    """A corpus or lab document is malformed."""


class EngineError(PulmoMedError):
    """The generation engine failed or is not running."""


class SettingsError(PulmoMedError, ValueError):
    """A PULMOMED_* variable (or the flag that sets the same knob) has a value we cannot use."""

    def __init__(self, name: str, raw: object, expected: str, esperado: str, *, flag: str = "") -> None:
        self.name, self.raw, self.expected, self.esperado = name, raw, expected, esperado
        if flag:  # the value came from the command line, not from the environment
            super().__init__(
                f"El valor {raw!r} de {flag} no es válido: {esperado}.",
                f"{flag} {raw!r} is not valid: {expected}",
                f"give {flag} a valid value, or leave it out to use the default",
                f"da a {flag} un valor válido, o quítalo para usar el valor por defecto",
            )
            return
        variable = f"PULMOMED_{name.upper()}"
        super().__init__(
            f"El valor {raw!r} de {variable} no es válido: {esperado}.",
            f"{variable}={raw!r} is not valid: {expected}",
            f"set {variable} to a valid value, or unset it to use the default",
            f"da a {variable} un valor válido, o bórrala para usar el valor por defecto",
        )

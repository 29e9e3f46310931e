"""The headset contract as types: the simulation state in, the teacher's answer out.

Wire names are Spanish (API.md); every field also accepts its English name, never both at once.
Validation errors become `{"error": ..., "detalles": [{"campo", "mensaje"}]}` in Spanish, naming
the field exactly as the client sent it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

# Spanish wire name → English alias, in the order of API.md
FIELD_ALIASES: dict[str, str] = {
    "edad": "age",
    "es_fumador": "is_smoker",
    "pack_years": "pack_years",
    "dias_desde_cambio": "days_since_smoking_change",
    "dieta": "diet",
    "volumen_tumor_sensible": "sensitive_tumor_volume",
    "volumen_tumor_resistente": "resistant_tumor_volume",
    "tratamiento_activo": "active_treatment",
    "dias_tratamiento": "treatment_days",
    "modo": "mode",
    "caso_id": "case_id",
    "lung_state": "lung_state",
}

ADVERTENCIA = (
    "Contenido educativo generado para una simulación de PulmoMed. No es consejo médico ni "
    "sustituye el juicio clínico: cada decisión real se toma con las guías vigentes y un equipo "
    "multidisciplinar."
)


def _reject_text_and_bool(value: Any) -> Any:
    # JSON numbers only: lax pydantic would turn "55" or true into numbers
    if isinstance(value, (str, bool)):
        raise ValueError("number_expected")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not_finite")
    return value


def _choice(spanish: str) -> Any:
    return Field(validation_alias=AliasChoices(spanish, FIELD_ALIASES[spanish]))


JsonInt = Annotated[int, BeforeValidator(_reject_text_and_bool)]
JsonFloat = Annotated[float, BeforeValidator(_reject_text_and_bool)]

Diet = Literal["saludable", "normal", "mala"]
Treatment = Literal["ninguno", "quimio", "radio", "inmuno"]
Mode = Literal["libre", "biblioteca"]
LungState = Literal["sano", "en_riesgo", "estable", "progresando", "critico", "terminal"]


class SimulationState(BaseModel):
    """One POST /api/v1/consultar_profesor body."""

    model_config = ConfigDict(extra="ignore", populate_by_name=False, frozen=True)

    edad: JsonInt = Field(validation_alias=AliasChoices("edad", "age"), ge=18, le=100)
    es_fumador: bool = Field(
        default=False, validation_alias=AliasChoices("es_fumador", "is_smoker"), strict=True
    )
    pack_years: JsonFloat = Field(
        default=0.0, validation_alias=AliasChoices("pack_years"), ge=0, le=150, allow_inf_nan=False
    )
    dias_desde_cambio: JsonInt = Field(
        default=0, validation_alias=AliasChoices("dias_desde_cambio", "days_since_smoking_change"), ge=0
    )
    dieta: Diet = Field(default="normal", validation_alias=AliasChoices("dieta", "diet"))
    volumen_tumor_sensible: JsonFloat = Field(
        validation_alias=AliasChoices("volumen_tumor_sensible", "sensitive_tumor_volume"),
        ge=0,
        allow_inf_nan=False,
    )
    volumen_tumor_resistente: JsonFloat = Field(
        default=0.0,
        validation_alias=AliasChoices("volumen_tumor_resistente", "resistant_tumor_volume"),
        ge=0,
        allow_inf_nan=False,
    )
    tratamiento_activo: Treatment = Field(
        default="ninguno", validation_alias=AliasChoices("tratamiento_activo", "active_treatment")
    )
    dias_tratamiento: JsonInt = Field(
        default=0, validation_alias=AliasChoices("dias_tratamiento", "treatment_days"), ge=0
    )
    modo: Mode = Field(default="libre", validation_alias=AliasChoices("modo", "mode"))
    caso_id: str | None = Field(default=None, validation_alias=AliasChoices("caso_id", "case_id"))
    lung_state: LungState | None = Field(default=None, validation_alias=AliasChoices("lung_state"))

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for spanish, english in FIELD_ALIASES.items():
                if spanish != english and spanish in data and english in data:
                    raise ValueError(f"both_names:{spanish}:{english}")
        return data

    @model_validator(mode="after")
    def _library_case_is_known(self, info: ValidationInfo) -> SimulationState:
        known = (info.context or {}).get("case_ids")
        if self.modo == "biblioteca" and known is not None and self.caso_id not in known:
            raise ValueError("unknown_case")
        return self

    @property
    def total_volume(self) -> float:
        return self.volumen_tumor_sensible + self.volumen_tumor_resistente


SectionSource = Literal["modelo", "fuentes"]


class SectionOrigin(BaseModel):
    """Who wrote each section of an answer: "modelo", the LLM (without the sentences the grounding
    check withheld), or "fuentes", the grounded summary of the retrieved passages (extractive.py),
    which stands in for a section the model did not write or whose every sentence was withheld.
    `llm_model` names one writer for the whole answer; this tells the two sections apart."""

    model_config = ConfigDict(frozen=True)

    explicacion: SectionSource
    recomendacion: SectionSource


class TeacherResponse(BaseModel):
    """The 200 body: the keys the headset reads, plus a few extras it ignores."""

    explicacion: str
    recomendacion: str
    fuentes: list[str]
    advertencia: str = ADVERTENCIA
    retrieved_chunks: int
    llm_model: str
    model_used: str
    processing_time_ms: int
    # extras (API.md allows them): what a teacher or the status page can use
    estadio: str
    pasajes: list[str] = []
    cache: Literal["hit", "miss", "shared"] = "miss"
    # sentences of the model's answer withheld because the sources do not support them
    frases_retiradas: int = 0
    origen: SectionOrigin = Field(
        description='Per section, "modelo" when the LLM wrote it (possibly trimmed by the grounding '
        'check) or "fuentes" when it is the grounded summary of the sources: an answer labelled '
        "with the model's name may still have one section from the sources, and a fallback that "
        "kept the sentences a student was already shown may have one from the model."
    )


class FieldProblem(BaseModel):
    campo: str
    mensaje: str


class InvalidRequest(Exception):
    """A request body that breaks the contract; carries the Spanish details for a 422."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.campo}: {p.mensaje}" for p in problems))
        self.problems = problems

    def body(self) -> dict[str, Any]:
        return {
            "error": "La solicitud no es válida: revisa los campos indicados.",
            "detalles": [p.model_dump() for p in self.problems],
        }


def parse_state(data: Any, case_ids: set[str] | frozenset[str]) -> SimulationState:
    """Validate a decoded JSON object; raise InvalidRequest with Spanish, field-named details."""
    try:
        return SimulationState.model_validate(data, context={"case_ids": case_ids})
    except ValidationError as exc:
        raise InvalidRequest(_problems(exc, data)) from None


_TYPE_WORDS = {
    "int": "un número entero",
    "float": "un número",
    "bool": "true o false",
    "string": "un texto",
}


def _problems(exc: ValidationError, data: Any) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    for err in exc.errors():
        field_name = str(err["loc"][0]) if err["loc"] else ""
        ctx = err.get("ctx") or {}
        message = str(ctx.get("error", "")) if err["type"] == "value_error" else ""
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if message.startswith("both_names:"):
            _, spanish, english = message.split(":")
            problems.append(
                FieldProblem(
                    campo=spanish,
                    mensaje=f"Usa '{spanish}' o '{english}', no los dos a la vez.",
                )
            )
            continue
        if message == "unknown_case":
            problems.append(
                FieldProblem(
                    campo=_sent_name("caso_id", data),
                    mensaje="En modo 'biblioteca' hace falta un caso_id de la biblioteca de casos "
                    "(GET /api/v1/library_cases).",
                )
            )
            continue
        problems.append(FieldProblem(campo=_sent_name(field_name, data), mensaje=_spanish(err)))
    return problems or [FieldProblem(campo="", mensaje="El cuerpo no cumple el contrato.")]


def _sent_name(spanish: str, data: Any) -> str:
    """The field name as the client wrote it (Spanish or English)."""
    english = FIELD_ALIASES.get(spanish, spanish)
    if isinstance(data, dict) and spanish not in data and english in data:
        return english
    return spanish


def _spanish(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "Este campo es obligatorio."
    if kind in ("greater_than_equal", "greater_than"):
        return f"Debe ser mayor o igual que {ctx.get('ge', ctx.get('gt'))}."
    if kind in ("less_than_equal", "less_than"):
        return f"Debe ser menor o igual que {ctx.get('le', ctx.get('lt'))}."
    if kind == "finite_number" or "not_finite" in str(ctx.get("error", "")):
        return "Debe ser un número finito (no NaN, Infinity ni un número demasiado grande)."
    if kind == "int_parsing_size" or (kind.startswith("float") and isinstance(err.get("input"), int)):
        # an integer too long to be one («Debe ser un número» for 400 nines misled the sender)
        return "Número demasiado grande para este campo."
    if kind == "literal_error":
        # pydantic lists the choices in English ("'a', 'b' or 'c'")
        return f"Valor no permitido; usa uno de: {str(ctx.get('expected', '')).replace(' or ', ', ')}."
    if kind == "string_unicode":
        return "El texto contiene caracteres Unicode no válidos."
    if "number_expected" in str(ctx.get("error", "")):
        return "Debe ser un número JSON (no un texto entre comillas ni true/false)."
    for key, words in _TYPE_WORDS.items():
        if kind.startswith(key):
            if kind.endswith("_fraction"):
                return "Debe ser un número entero, sin decimales."
            return f"Debe ser {words}."
    return "Valor no válido."


def approximate_stage(total_volume_cm3: float) -> str:
    """API.md's educational simplification: stage from total tumour volume."""
    if total_volume_cm3 < 3:
        return "IA (T1a)"
    if total_volume_cm3 < 14:
        return "IB (T2a)"
    if total_volume_cm3 < 28:
        return "IIA (T2b)"
    if total_volume_cm3 < 65:
        return "IIB (T3)"
    return "IIIA+ (T4 o avanzado)"

"""The canonical, bucketed simulation state: the one thing a prompt and a cache key are built from.

Two students whose states fall in the same buckets get the same prompt and may share an answer;
anything that would change the prompt is in the buckets, so a cache hit never hands one student
another student's different case.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .cases import LibraryCase
from .schema import SimulationState, approximate_stage

TREATMENT_NAMES = {
    "ninguno": "ninguno",
    "quimio": "quimioterapia",
    "radio": "radioterapia",
    "inmuno": "inmunoterapia",
}
TREATMENT_QUERIES = {
    "quimio": "quimioterapia con doblete de platino en cáncer de pulmón: efectos adversos",
    "radio": "radioterapia torácica: toxicidad, esofagitis y neumonitis",
    "inmuno": "inmunoterapia con inhibidores de PD-1 o PD-L1 en cáncer de pulmón",
}
DIET_NAMES = {"saludable": "saludable", "normal": "normal", "mala": "poco saludable"}
LUNG_STATE_NAMES = {
    "sano": "sano",
    "en_riesgo": "en riesgo",
    "estable": "estable",
    "progresando": "progresando",
    "critico": "crítico",
    "terminal": "terminal",
}


@dataclass(frozen=True)
class CanonicalState:
    age_band: str
    smoking: str  # "nunca" | "exfumador" | "fumador"
    pack_years_band: str
    smoking_change_band: str
    diet: str
    stage: str
    resistant_band: str
    treatment: str
    treatment_days_band: str
    mode: str
    case_id: str | None
    lung_state: str | None

    def key_material(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


def age_band(age: int) -> str:
    """The decade of `age` ('60-69'); the schema allows up to 100, so the top band is '90 o más'."""
    decade = min(age // 10 * 10, 90)
    return "90 o más" if decade == 90 else f"{decade}-{decade + 9}"


def canonicalize(state: SimulationState) -> CanonicalState:
    if state.es_fumador:
        smoking = "fumador"
    elif state.pack_years > 0:
        smoking = "exfumador"
    else:
        smoking = "nunca"
    total = state.total_volume
    return CanonicalState(
        age_band=age_band(state.edad),
        smoking=smoking,
        pack_years_band=_band(
            state.pack_years,
            [(0, "0"), (10, "menos de 10"), (20, "10-19"), (30, "20-29"), (50, "30-49")],
            "50 o más",
        ),
        smoking_change_band=""
        if smoking == "nunca"
        else _band(
            state.dias_desde_cambio,
            [
                (0, ""),
                (30, "menos de 1 mes"),
                (365, "menos de 1 año"),
                (5 * 365, "1-5 años"),
                (15 * 365, "5-15 años"),
            ],
            "más de 15 años",
        ),
        diet=state.dieta,
        stage=approximate_stage(total),
        resistant_band=_resistant_band(state.volumen_tumor_resistente, total),
        treatment=state.tratamiento_activo,
        treatment_days_band=""
        if state.tratamiento_activo == "ninguno"
        else _band(
            state.dias_tratamiento,
            [(0, "recién iniciado"), (30, "menos de 30 días"), (90, "30-89 días")],
            "90 días o más",
        ),
        mode=state.modo,
        case_id=state.caso_id if state.modo == "biblioteca" else None,
        lung_state=state.lung_state,
    )


def _band(value: float, upper_bounds: list[tuple[float, str]], top: str) -> str:
    """The label of the first band whose bound the value stays below (bound 0 means == 0)."""
    for bound, label in upper_bounds:
        if (bound == 0 and value == 0) or (bound > 0 and value < bound):
            return label
    return top


def _resistant_band(resistant: float, total: float) -> str:
    if total <= 0 or resistant <= 0:
        return "0 %"
    fraction = resistant / total
    if fraction < 0.10:
        return "menos del 10 %"
    if fraction < 0.30:
        return "10-30 %"
    return "más del 30 %"


def smoking_phrase(c: CanonicalState) -> str:
    if c.smoking == "nunca":
        return "nunca fumador"
    text = f"{'fumador activo' if c.smoking == 'fumador' else 'exfumador'}, {c.pack_years_band} paquetes-año"
    if c.smoking_change_band:
        verb = "dejó de fumar hace" if c.smoking == "exfumador" else "fuma de nuevo desde hace"
        text += f" ({verb} {c.smoking_change_band})"
    return text


def treatment_phrase(c: CanonicalState) -> str:
    if c.treatment == "ninguno":
        return "sin tratamiento activo"
    return f"{TREATMENT_NAMES[c.treatment]} ({c.treatment_days_band})"


RESISTANCE_QUERY = "volumen resistente: selección clonal y resistencia adquirida al tratamiento"
SMOKING_QUERIES = {
    # a smoker with a tumour: quitting now still matters (Parsons), not the prevention passage
    "fumador": (
        "dejar de fumar después del diagnóstico de cáncer de pulmón: seguir fumando aumenta la mortalidad"
    ),
    # the patient already has a tumour: screening (what "exfumador" alone finds) is not their
    # question (answers recommended a low-dose CT to stage a known cancer), nor quitting after the
    # diagnosis (answers told an ex-smoker of years to quit); that quitting pays at any age is
    "exfumador": "exfumador: dejar de fumar beneficia a cualquier edad y aumenta la esperanza de vida",
    "nunca": "cáncer de pulmón en nunca fumadores: adenocarcinoma y mutaciones EGFR o ALK",
}
# a patient the simulator calls critical or terminal: what care they need comes right after the
# stage; worded to find ASCO's recommendation itself (the Temel trial's passage has none to quote)
PALLIATIVE_QUERY = (
    "la guía de ASCO recomienda cuidados paliativos especializados precoces junto al tratamiento "
    "oncológico en el cáncer de pulmón avanzado"
)
DYING = ("critico", "terminal")
# a tumour that grows under treatment: what comes next (re-evaluation, a second line), not the
# stage's first treatment (an answer offered surgery to a patient progressing on chemotherapy)
PROGRESSION_QUERY = "progresión del tumor durante el tratamiento: reevaluar y tratamiento de segunda línea"
# a patient on treatment whose tumour does not grow: what comes next depends on the stage (a stage
# II patient 100 days into chemotherapy was recommended the stage's first treatment, surgery). In
# stage I-II the treatment is curative: complete it (then surgery or CT follow-up), or after
# radiotherapy, CT follow-up; in stage IV keep it and assess the response (RECIST 1.1). In stage
# III the stage passage's standard names what follows (consolidation after chemoradiotherapy).
CURATIVE_QUERY = (
    "estadios I-II: completar la quimioterapia o inmunoterapia con intención curativa, "
    "neoadyuvante o adyuvante"
)
RADIOTHERAPY_FOLLOW_UP_QUERY = "seguimiento con TC de tórax tras radioterapia con intención curativa (SBRT)"
# stage IA on chemotherapy or immunotherapy: neither is part of its treatment, which is local (no
# benefit of adjuvant chemotherapy in IA in LACE); a blind review flagged «en los estadios I-II la
# quimioterapia… forma parte de un tratamiento con intención curativa» as too broad for IA
LOCAL_TREATMENT_QUERY = (
    "quimioterapia adyuvante en el estadio IA: sin beneficio en LACE, las guías no la recomiendan"
)
RESPONSE_QUERY = "estadio IV en tratamiento sin progresión: mantenerlo y evaluar la respuesta con RECIST 1.1"
# stage IV on radiotherapy: a local treatment, for symptoms, while the systemic one controls the
# disease (not "cycles" of it to assess)
STAGE_IV_RADIOTHERAPY_QUERY = (
    "estadio IV en radioterapia: la radioterapia alivia síntomas mientras el tratamiento sistémico "
    "controla la enfermedad"
)
NEXT_STEP_QUERIES = {
    "local": LOCAL_TREATMENT_QUERY,
    "curative": CURATIVE_QUERY,
    "radiotherapy": RADIOTHERAPY_FOLLOW_UP_QUERY,
    "advanced": RESPONSE_QUERY,
    "advanced-radiotherapy": STAGE_IV_RADIOTHERAPY_QUERY,
}
_MANY_RESISTANT = ("10-30 %", "más del 30 %")


def patient_stage(c: CanonicalState, case: LibraryCase | None) -> str:
    """The patient's stage: a library case's own (its volumes may suggest another: SEER_004 is
    stage IV with a primary whose volume reads "IIB"), else the one from the tumour volume."""
    return case.estadio if case is not None else c.stage


def retrieval_queries(c: CanonicalState, case: LibraryCase | None) -> list[str]:
    """Spanish queries, one per aspect of the state, most important first.

    The prompt shows the passages in this order too: stage and treatment lead because a small
    model restates passage [1], and they are also what students in a class share most, so
    prompts share long cached prefixes (putting the resistance passage first saved ~5 % of prompt
    tokens but led the 0.5B model to open with the simulator's two-population passage)."""
    # a library case's own stage: the passage of the stage its volumes suggest would contradict it
    stage = patient_stage(c, case)
    stage_roman = _stage_label(stage)
    queries: list[str] = []
    if case is not None:
        queries.append(f"caso de biblioteca {case.caso_id} {case.titulo}")
    queries.append(f"estadio {stage_roman} del cáncer de pulmón no microcítico: qué significa y tratamiento")
    if c.lung_state in DYING:
        queries.append(PALLIATIVE_QUERY)
    treatment = [TREATMENT_QUERIES[c.treatment]] if c.treatment != "ninguno" else []
    resistance = [RESISTANCE_QUERY] if resistance_matters(c) else []
    smoking = [SMOKING_QUERIES[c.smoking]]
    if progressing_on_treatment(c):
        # what comes next, then why it grows (the resistant clones), then the treatment's side effects
        queries += [PROGRESSION_QUERY, *resistance, *treatment, *smoking]
    elif (step := next_step(c, stage)) is not None:
        # what comes next; a smoker's quitting before the treatment's side effects, so that it
        # stays among the few passages
        if c.smoking == "fumador":
            queries += [NEXT_STEP_QUERIES[step], *smoking, *treatment, *resistance]
        else:
            queries += [NEXT_STEP_QUERIES[step], *treatment, *resistance, *smoking]
    else:
        queries += [*treatment, *resistance, *smoking]
    return queries


def _stage_label(stage: str) -> str:
    """The stage itself of a stage label: "IIIA+ (T4 o avanzado)" → "IIIA"."""
    return stage.split(" ")[0].rstrip("+")


def stage_group(stage: str) -> str:
    """ "I", "II", "III" or "IV" of a stage label ("IIA (T2b)", "IIIA+ (T4 o avanzado)", "IVA")."""
    roman = _stage_label(stage)
    return "IV" if roman.startswith("IV") else roman.rstrip("ABC")


def responding_to_treatment(c: CanonicalState) -> bool:
    """On treatment and neither progressing nor critical or terminal (stable, or the simulator
    says nothing of the lung): the treatment goes on."""
    return c.treatment != "ninguno" and c.lung_state not in ("progresando", *DYING)


def next_step(c: CanonicalState, stage: str) -> str | None:
    """What comes next for a patient responding to treatment at `stage`: "curative" (stage I-II,
    complete the plan), "radiotherapy" (stage I-II, CT follow-up after it), "local" (stage IA on
    chemotherapy or immunotherapy, which are not its treatment: the local one is), "advanced"
    (stage IV, keep it and assess the response) or "advanced-radiotherapy" (stage IV on
    radiotherapy: a local treatment for symptoms, while the systemic one controls the disease; a
    review read «evaluar la respuesta… tras dos o tres ciclos» for it as radiotherapy given in
    cycles); None when not on treatment, or in stage III, whose stage passage names it.
    Retrieval (NEXT_STEP_QUERIES) and the summary's recommendation (extractive._NEXT_STEP) both
    follow it."""
    if not responding_to_treatment(c):
        return None
    group = stage_group(stage)
    if group in ("I", "II"):
        if c.treatment == "radio":
            return "radiotherapy"
        return "local" if _stage_label(stage).startswith("IA") else "curative"
    if group == "IV":
        return "advanced-radiotherapy" if c.treatment == "radio" else "advanced"
    return None


def progressing_on_treatment(c: CanonicalState) -> bool:
    return c.treatment != "ninguno" and c.lung_state == "progresando"


def resistance_matters(c: CanonicalState) -> bool:
    """Whether the resistant clones earn one of the few passages: a share of 10 % or more, or any
    share under treatment or while the tumour progresses. A few percent in an untreated tumour
    took a slot from the stage's own teaching, and its definition became the whole answer."""
    if c.resistant_band == "0 %":
        return False
    return c.resistant_band in _MANY_RESISTANT or c.treatment != "ninguno" or c.lung_state == "progresando"


def cache_key(c: CanonicalState, passage_ids: list[str], model_sha: str, index_id: str) -> str:
    """Same key ⇔ same prompt: the canonical state, the passages, the model and the index."""
    material = "\x1f".join([c.key_material(), ",".join(passage_ids), model_sha, index_id])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()

"""The page a teacher opens in a browser: does it work, and what address do headsets use."""

from __future__ import annotations

import html
from typing import Any

from ..activity import CACHE, MODEL
from ..network import is_loopback_host, teacher_urls

_LABELS = {
    "healthy": ("Listo para la clase", "#1b7f3b"),
    "starting": ("Iniciando… (cargando modelos)", "#b26a00"),
    "degraded": ("Con problemas: revisa los componentes", "#b00020"),
}
# what "degraded" means for the class: without the index no headset gets an answer; without the
# language model they get summaries of the sources
_NO_ANSWERS = "Los visores NO recibirán respuestas hasta resolver el problema de abajo."
_SUMMARIES_ONLY = "Los visores reciben respuestas resumidas de las fuentes, sin el modelo de lenguaje."
_STATES = {
    "ready": "Listo",
    "loading": "Cargando…",
    "failed": "Falla",
    "stalled": "Atascado",
}
LOOPBACK_WARNING = (
    "Solo escucha en este portátil: los visores no pueden conectarse. Arranca con "
    "--host 0.0.0.0 (o PULMOMED_HOST=0.0.0.0)."
)
NO_NETWORK = "No se detecta ninguna red local: conecta el portátil a la red del aula."
_COMPONENT_NAMES = {
    "llm": "Modelo de lenguaje",
    "embeddings": "Modelo de embeddings",
    "index": "Base de conocimiento",
    "cache": "Caché de respuestas",
}


def _way_out(comp: dict) -> str:
    """What to do about a fault: in Spanish for the teacher (who can act), then the lab admin's
    command line (English, as the console and the log say it)."""
    solucion, fix = comp.get("solucion", ""), comp.get("fix", "")
    out = f"<br>Solución: {html.escape(solucion)}" if solucion else ""
    if fix:
        out += f"<br>{'' if solucion else 'Solución: '}<code>{html.escape(fix)}</code>"
    return out


def render_status_page(health: dict[str, Any], host: str, port: int) -> str:
    """The page for a server bound to `host`:`port` (the port it really listens on)."""
    label, colour = _LABELS.get(health["status"], (health["status"], "#555"))
    components = health["components"]
    meaning = ""
    if health["status"] == "degraded":
        blocked = any(components.get(k, {}).get("status") == "failed" for k in ("index", "embeddings"))
        meaning = f"<p><strong>{html.escape(_NO_ANSWERS if blocked else _SUMMARIES_ONLY)}</strong></p>"
    rows = []
    for key, comp in components.items():
        status = comp.get("status", "?")
        problem = comp.get("error", "")
        rows.append(
            f"<tr><td>{html.escape(_COMPONENT_NAMES.get(key, key))}</td>"
            f"<td>{html.escape(_STATES.get(status, status))}</td>"
            f"<td>{html.escape(_detail(key, comp))}</td><td>{html.escape(problem)}{_way_out(comp)}</td></tr>"
        )
    if is_loopback_host(host):
        url_items = f"<li><strong>{html.escape(LOOPBACK_WARNING)}</strong></li>"
    else:
        urls = teacher_urls(host, port)
        url_items = "".join(f"<li><code>{html.escape(u)}</code></li>" for u in urls)
        url_items = url_items or f"<li>{html.escape(NO_NETWORK)}</li>"
    seconds = 3 if health["status"] == "starting" else 30
    refresh = f'<meta http-equiv="refresh" content="{seconds}">'
    activity = _activity_section(health.get("activity"))
    return f"""<!doctype html>
<html lang="es"><head><meta charset="utf-8">{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PulmoMed Edge — estado</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}}
code{{overflow-wrap:anywhere}}
.badge{{display:inline-block;padding:.4rem .9rem;border-radius:.4rem;color:#fff;background:{colour}}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}}</style>
</head><body>
<h1>PulmoMed Edge <small>v{html.escape(health["version"])}</small></h1>
<p class="badge">{html.escape(label)}</p>
{meaning}<h2>Dirección para los visores</h2>
<p>En la app de PulmoMed de cada visor, usa una de estas direcciones:</p>
<ul>{url_items}</ul>
<h2>Componentes</h2>
<table><tr><th>Componente</th><th>Estado</th><th>Detalle</th><th>Problema y solución</th></tr>
{"".join(rows)}</table>
{activity}
</body></html>"""


def _detail(key: str, comp: dict[str, Any]) -> str:
    if key == "index" and "passages" in comp:
        return f"{comp['passages']} pasajes"
    if key == "cache" and "entries" in comp:
        return f"{comp['entries']} respuestas guardadas"
    return str(comp.get("model", ""))


# when this share of recent answers are summaries because the laptop was busy, say so
BUSY_WARNING_SHARE = 0.2
BUSY_WARNING_MIN_ANSWERS = 10


def _activity_section(activity: dict[str, Any] | None) -> str:
    if not activity:
        return ""
    kinds: dict[str, int] = activity["by_kind"]
    minutes = round(activity["window_s"] / 60)
    answers = activity["answers"]
    if not answers:
        return f"<h2>Actividad (últimos {minutes} minutos)</h2><p>Todavía no hay preguntas.</p>"
    model, cached = kinds.get(MODEL, 0), kinds.get(CACHE, 0)
    summaries = answers - model - cached
    text = (
        f"{answers} respuestas: {model} escritas por el modelo, {cached} desde la caché, "
        f"{summaries} resumidas directamente de las fuentes."
    )
    warning = ""
    if answers >= BUSY_WARNING_MIN_ANSWERS and activity["busy_share"] >= BUSY_WARNING_SHARE:
        share = round(100 * activity["busy_share"])
        warning = (
            f'<p style="color:#b26a00"><strong>El portátil va justo:</strong> el {share} % de las '
            "respuestas recientes fueron resúmenes de las fuentes porque el modelo estaba ocupado. "
            "Menos preguntas a la vez, o un equipo con más núcleos, lo mejora.</p>"
        )
    backfill = activity.get("backfill") or {}
    if backfill.get("answered") or backfill.get("pending"):
        text += (
            f" Cuando el modelo queda libre, prepara la respuesta completa a las preguntas que "
            f"recibieron un resumen: {backfill.get('answered', 0)} listas, "
            f"{backfill.get('pending', 0)} en espera; si se repiten, llegan al instante."
        )
    grounding = activity.get("grounding") or {}
    if grounding.get("trimmed"):
        text += (
            f" Desde el arranque, a {grounding['trimmed']} de {grounding.get('answers', 0)} respuestas "
            f"del modelo se les retiraron {grounding.get('sentences', 0)} frases que las fuentes no "
            "respaldan."
        )
    return f"<h2>Actividad (últimos {minutes} minutos)</h2><p>{html.escape(text)}</p>{warning}"

"""The page a teacher opens in a browser: does it work, and what address do headsets use."""

from __future__ import annotations

import html
from typing import Any

from ..activity import CACHE, MODEL
from ..network import teacher_urls

_LABELS = {
    "healthy": ("Listo para la clase", "#1b7f3b"),
    "starting": ("Iniciando… (cargando modelos)", "#b26a00"),
    "degraded": ("Con problemas: revisa los componentes", "#b00020"),
}
_COMPONENT_NAMES = {
    "llm": "Modelo de lenguaje",
    "embeddings": "Modelo de embeddings",
    "index": "Base de conocimiento",
    "cache": "Caché de respuestas",
}


def render_status_page(health: dict[str, Any], port: int) -> str:
    label, colour = _LABELS.get(health["status"], (health["status"], "#555"))
    urls = [u for u in teacher_urls("0.0.0.0", port) if not u.startswith("http://127.")]
    rows = []
    for key, comp in health["components"].items():
        status = comp.get("status", "?")
        extra = comp.get("model") or comp.get("passages") or comp.get("entries", "")
        problem = comp.get("error", "")
        fix = comp.get("fix", "")
        rows.append(
            f"<tr><td>{html.escape(_COMPONENT_NAMES.get(key, key))}</td><td>{html.escape(status)}</td>"
            f"<td>{html.escape(str(extra))}</td><td>{html.escape(problem)}"
            f"{'<br><code>' + html.escape(fix) + '</code>' if fix else ''}</td></tr>"
        )
    url_items = "".join(f"<li><code>{html.escape(u)}</code></li>" for u in urls) or (
        "<li>No se detecta ninguna red local: conecta el portátil a la red del aula.</li>"
    )
    seconds = 3 if health["status"] == "starting" else 30
    refresh = f'<meta http-equiv="refresh" content="{seconds}">'
    activity = _activity_section(health.get("activity"))
    return f"""<!doctype html>
<html lang="es"><head><meta charset="utf-8">{refresh}
<title>PulmoMed Edge — estado</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}}
.badge{{display:inline-block;padding:.4rem .9rem;border-radius:.4rem;color:#fff;background:{colour}}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}}</style>
</head><body>
<h1>PulmoMed Edge <small>v{html.escape(health["version"])}</small></h1>
<p class="badge">{html.escape(label)}</p>
<h2>Dirección para los visores</h2>
<p>En la app de PulmoMed de cada visor, usa una de estas direcciones:</p>
<ul>{url_items}</ul>
<h2>Componentes</h2>
<table><tr><th>Componente</th><th>Estado</th><th>Detalle</th><th>Problema y solución</th></tr>
{"".join(rows)}</table>
{activity}
</body></html>"""


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

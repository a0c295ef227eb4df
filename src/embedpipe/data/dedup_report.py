"""The dedup HTML report: leakage per category and thumbnails of the largest groups.

Self-contained (thumbnails inlined as base64 JPEG) so the Kubeflow UI can show
it as an ``HTML`` artifact without access to the images.
"""

import base64
import html
import io

from PIL import Image

from embedpipe.core import datasets

THUMBNAIL_SIDE = 96
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
.group { border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin: 10px 0; }
.leak { border-color: #d63031; background: #fff5f5; }
figure { display: inline-block; margin: 4px; text-align: center; font-size: 11px; }
figure img { display: block; border: 2px solid #bbb; }
figure.rep img { border-color: #0984e3; }
"""


def _thumbnail(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except Exception:  # an undecodable member shows as a missing picture
        return ""
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(images_uri: str, records: list[dict], leakage: dict, config) -> str:
    groups: dict[int, list[dict]] = {}
    for record in records:
        groups.setdefault(record["group_id"], []).append(record)
    shown = sorted(groups)[: config.report_groups]  # group ids are ordered largest first
    pictures = datasets.image_bytes(images_uri, {r["image_id"] for g in shown for r in groups[g]})
    escape = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe dedup</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Duplicates: {len(groups)} groups, {leakage['leaking_groups']} leaking across "
        "splits</h1>",
        f"<p>{escape(config.hash)} hash, {config.hash_size}x{config.hash_size}, near duplicates "
        f"within {config.max_distance} bits; drop = {escape(config.drop)}.</p>",
        "<h2>Leakage by category</h2><table><tr><th>category</th><th>leaking groups</th>"
        "<th>images</th><th>splits spanned</th></tr>",
    ]
    for category, entry in sorted(leakage["by_category"].items()):
        spans = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(entry["splits"].items()))
        parts.append(
            f"<tr><td>{escape(category)}</td><td>{entry['groups']}</td>"
            f"<td>{entry['images']}</td><td>{spans}</td></tr>"
        )
    parts.append(f"</table><h2>Largest groups (showing {len(shown)})</h2>")
    for group_id in shown:
        members = groups[group_id]
        leak = " leak" if members[0]["leaks"] else ""
        parts.append(
            f"<div class='group{leak}'><b>group {group_id}</b>: {len(members)} images"
            f"{' — leaks across splits' if leak else ''}<br>"
        )
        for record in members:
            thumb = _thumbnail(pictures.get(record["image_id"], b""))
            kind = "exact" if record["exact"] else f"d={record['distance']}"
            rep = " class='rep'" if record["representative"] else ""
            parts.append(
                f"<figure{rep}><img alt='' width='{THUMBNAIL_SIDE}' "
                f"src='data:image/jpeg;base64,{thumb}'>{escape(record['split'])} · {kind}<br>"
                f"<span title='{escape(record['source'])}'>"
                f"{escape(record['source'].rsplit('/', 1)[-1][:24])}</span></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)

"""Markdown to one self-contained HTML page: the report (kdlab/report.py) and ``kdlab
compare`` (kdlab/compare.py) both write their Markdown and its HTML rendering with this."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;"
         "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
         "code{background:#f3f3f3;padding:0 3px;border-radius:3px;font-size:90%}"
         "img{max-width:100%}figure{display:inline-block;vertical-align:top;margin:0.5em}"
         "figcaption{font-size:12px;color:#555}td{white-space:nowrap}")


def markdown_to_html(text: str, title: str, base_dir: Path) -> str:
    """A self-contained HTML page of the Markdown ``text`` (python-markdown with tables, so
    `code` is <code> and tables are tables): each image the text links (a path relative to
    ``base_dir``) inlined as a base64 PNG in a <figure> whose caption is its alt text."""
    try:
        import markdown
    except ImportError:
        from .errors import KdlabError

        raise KdlabError("the HTML report needs python-markdown: pip install 'kdlab[analysis]'") from None

    def figure(match) -> str:
        caption, src = html.unescape(match.group(1)), html.unescape(match.group(2))
        data = base64.b64encode((Path(base_dir) / src).read_bytes()).decode()
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    body = re.sub(r'<p>\s*<img alt="([^"]*)" src="([^"]+\.png)"\s*/?>\s*</p>', figure, body)
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")

"""The API pages (/docs: Swagger UI, /redoc: ReDoc) from assets installed with the package, never from a CDN.

FastAPI's own pages load Swagger UI and ReDoc from jsDelivr: air-gapped, or behind a strict egress policy, /docs was a
blank page. The assets come from `fastapi-offline` (Swagger UI 5 and ReDoc 2 files in a wheel, MIT); without it, /docs
is a small self-contained page that lists the operations of /openapi.json and /redoc is not served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

ASSETS = "/docs/assets"  # the access middleware gives these the permission of /docs


def assets_dir() -> Path | None:
    """Where the packaged Swagger UI and ReDoc files are, or None when `fastapi-offline` is not installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    d = Path(fastapi_offline.__file__).parent / "static"
    return d if (d / "swagger-ui-bundle.js").is_file() else None


def register(app: FastAPI) -> None:
    """Add /docs, /docs/oauth2-redirect, /redoc and the assets they load; `app` must be made with docs_url=None, redoc_url=None."""
    static = assets_dir()
    openapi = app.openapi_url or "/openapi.json"
    title = app.title

    if static is None:
        @app.get("/docs", include_in_schema=False)
        async def plain_docs(request: Request) -> HTMLResponse:
            return HTMLResponse(_PLAIN.replace("__TITLE__", title).replace("__OPENAPI__", request.scope.get("root_path", "") + openapi))
        return

    from fastapi.staticfiles import StaticFiles

    app.mount(ASSETS, StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi, title=f"{title} - Swagger UI", oauth2_redirect_url=root + "/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            # validatorUrl: Swagger UI would otherwise fetch a badge from validator.swagger.io for non-local specs.
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=root + openapi, title=f"{title} - ReDoc", redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False)


_PLAIN = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__ - API</title>
<style>body{font-family:sans-serif;margin:2em;max-width:70em}code{background:#eee;padding:0 .3em}li{margin:.3em 0}</style>
</head><body><h1>__TITLE__</h1><p>The OpenAPI document: <a href="__OPENAPI__">__OPENAPI__</a>
(install <code>fastapi-offline</code> for Swagger UI).</p><ul id="ops"></ul>
<script>
fetch("__OPENAPI__").then(r => r.json()).then(doc => {
  const ul = document.getElementById("ops");
  for (const [path, ops] of Object.entries(doc.paths || {})) for (const [method, op] of Object.entries(ops)) {
    const li = document.createElement("li");
    li.textContent = method.toUpperCase() + " " + path + (op.summary ? " - " + op.summary : "");
    ul.appendChild(li);
  }
});
</script></body></html>
"""

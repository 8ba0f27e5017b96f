"""The STAC API: stac-fastapi composed with the similarity search extension."""

import logging


def _import_stac_fastapi_quietly() -> None:
    """Import stac-fastapi without the warning that its module-level default settings log
    ("Using default values for stac_fastapi_title, ..."): create_api gives the app its own
    title, description, landing page id and version, so that warning is false here."""
    logger = logging.getLogger("stac_fastapi.types.config")
    disabled, logger.disabled = logger.disabled, True
    try:
        import stac_fastapi.types.core  # noqa: F401
    finally:
        logger.disabled = disabled


_import_stac_fastapi_quietly()

"""The STAC API: stac-fastapi composed with the similarity search extension."""

import logging


class _SettingsGiven(logging.Filter):
    """Drop stac-fastapi's import-time warning that the API's title, description, landing id
    and version are its defaults: it is logged when ``stac_fastapi.types.core`` builds its
    module-level settings from the environment, before ``create_api`` passes its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using default values for stac_fastapi_")


logging.getLogger("stac_fastapi.types.config").addFilter(_SettingsGiven())

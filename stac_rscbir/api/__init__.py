"""The STAC API: stac-fastapi composed with the similarity search extension."""

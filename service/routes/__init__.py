"""HTTP routes: health and metrics (open), image generation (behind the optional API key)."""

"""The local p-video-avatar API server: routes, job queue, chaos knobs, start-up, LLM stand-in."""

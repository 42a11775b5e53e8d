"""The local engine's renderer: speech, face animation and encoding into an MP4."""

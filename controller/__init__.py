"""The reconciler and controllers that give back addresses of pods that are gone.

Not written yet: see the reconciler issue. Nothing here is imported by the plugin.
"""

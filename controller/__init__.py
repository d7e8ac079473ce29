"""The reconciler: gives back the addresses of pods that are gone, in one pass (the CronJob,
`reconciler.py`) or as a controller that watches pods and holds a Lease (`controller.py`). It
judges with pure logic (`leaks.py`) and frees with the same compare-and-swap as the plugin
(`reclaim.py`). Nothing here is imported by the plugin.
"""

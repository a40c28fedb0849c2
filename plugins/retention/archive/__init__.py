"""Archives: value codecs, the archive store, manifests, restore and checks in place."""

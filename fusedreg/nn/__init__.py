"""fusedreg.nn"""

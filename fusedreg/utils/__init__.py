"""fusedreg.utils"""

"""fusedreg.reference"""

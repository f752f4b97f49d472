"""fusedreg.bench"""

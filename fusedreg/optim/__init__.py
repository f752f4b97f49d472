"""fusedreg.optim"""

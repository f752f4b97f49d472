"""fusedreg.ops"""

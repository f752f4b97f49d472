"""fusedreg.triton"""

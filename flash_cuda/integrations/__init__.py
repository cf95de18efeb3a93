"""Integrations of flash_cuda with other libraries, imported on demand:

    import flash_cuda.integrations.transformers   # attn_implementation="flash_cuda"
"""

"""Sutra's checkpoint format for fast loading: `sutra convert SRC OUT`, then `--model OUT`.

format.py (the files and index), layout.py (which tensors, in which groups), writer.py, reader.py
(parallel chunked reads: mapped, O_DIRECT or buffered), partition.py (a file opened for one of those),
staging.py (CUDA pinned staging), pagecache.py (what is cached, faulting mappings in), load.py (the
weights as views, as they are read), convert.py (any source the loader takes -> a checkpoint).
"""

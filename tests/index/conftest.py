import os

# OpenMP thread teams spin on a busy 2-core machine: faiss runs these small searches fastest on one thread.
os.environ.setdefault("SPARSEMEM_THREADS", "1")

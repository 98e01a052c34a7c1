import torch

# One intra-op thread: on a busy 2-core machine, tiny recurrent models run many times
# slower with two threads fighting each other (see README, "Threads").
torch.set_num_threads(1)

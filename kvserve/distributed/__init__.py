"""Scale-out on torch.distributed: tensor parallelism across rank processes (gloo on CPUs, NCCL
on GPUs) and data-parallel engine replicas behind one server.

- `group.py`: `TPGroup`, the ranks of one engine, how they join (spawned here, or torchrun's
  env://), and collectives that remember the first failure;
- `tensor_parallel.py`: `load_sharded`, the model built at this rank's share (checkpoint tensors cut as read);
- `step_channel.py`: the step description rank 0 broadcasts each step (tokens and page tables);
- `executor.py`: `TensorParallelExecutor` (rank 0 sends, the other ranks run `serve_forever`).
"""

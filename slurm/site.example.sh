# shellcheck shell=bash
# slurm/site.example.sh: a template for slurm/site.sh, the one place for this cluster's settings.
# Copy it (`cp slurm/site.example.sh slurm/site.sh`, which git ignores) and edit. slurm/common.sh
# sources slurm/site.sh (or the file ULTRALONG_SITE names) first, on the login node when a script
# submits itself and again inside the job, so what is set here holds for both.

# sbatch options for every self-submitted job (`bash slurm/4m.sh`): account, partition, QoS, and
# a --time your partition allows (REPRODUCE.md §4 has the arithmetic: jobs needed per run).
# export ULTRALONG_SBATCH_ARGS="--account=proj123 --partition=gpu --qos=normal --time=24:00:00"

# Modules: a compiler, OpenMPI with PMIx, CUDA 13 (or 12.x) with a driver >= 580, NCCL.
# module purge
# module load gcc/12 openmpi/4.1-pmix cuda/13.0 nccl/2.27

# Where runs/ go: a file system every node mounts (checkpoints are ~129 GB each: REPRODUCE.md §4).
# export ULTRALONG_RUNS=/lustre/$USER/ultralong-runs

# The launcher: srun --mpi=pmix (default) or OpenMPI's mpirun inside the allocation.
# export ULTRALONG_LAUNCHER=mpirun
# export ULTRALONG_LAUNCHER_ARGS="--mpi=pmi2"            # MPICH under srun

# The fabric (see ul_env_defaults in slurm/common.sh for what each does).
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
# export NCCL_SOCKET_IFNAME=ib0
# export UCX_NET_DEVICES=mlx5_0:1

# One GPU per task bound by the site (srun --gpus-per-task=1 / --gpu-bind=single:1): every rank
# sees its GPU as device 0.
# export ULTRALONG_DEVICE=0

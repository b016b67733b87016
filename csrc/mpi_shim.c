/* What rsmpi 0.8 does not expose, exported from C so the values come from this MPI's own mpi.h
 * (compiled with mpicc by build.rs).
 *
 * MPI_IN_PLACE is a macro whose value differs per implementation: OpenMPI (void *)1,
 * MPICH (void *)-1. */
#include <mpi.h>

void *ul_mpi_in_place(void) { return MPI_IN_PLACE; }

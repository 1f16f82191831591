// MPI_Alltoallv and MPI_Alltoall wrapped through the PMPI profiling interface (MPI 3.1 §14.2): the
// executable's definitions take the place of the library's, count, and call the PMPI_ entry points.
// Peers are translated to MPI_COMM_WORLD ranks, so the sub-communicators of a two-level exchange
// (node and rail) are attributed to the right node.

#include "meter.hpp"

#include <vector>

#include <mpi.h>

namespace ep::meter {
namespace {

tally* open_tally = nullptr;
std::int64_t open_row_bytes = 0;
int open_ranks_per_node = 1;

// Adds count[p] items of `type` for every peer p of comm to the right field of `into`.
void add(bytes& into, const int* count, MPI_Datatype type, MPI_Comm comm) {
  int size = 0, item = 0, me = 0;
  PMPI_Comm_size(comm, &size);
  PMPI_Type_size(type, &item);
  PMPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Group group = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  PMPI_Comm_group(comm, &group);
  PMPI_Comm_group(MPI_COMM_WORLD, &world);
  std::vector<int> peers(static_cast<std::size_t>(size)), in_world(static_cast<std::size_t>(size));
  for (int p = 0; p < size; ++p) peers[static_cast<std::size_t>(p)] = p;
  PMPI_Group_translate_ranks(group, size, peers.data(), world, in_world.data());
  PMPI_Group_free(&group);
  PMPI_Group_free(&world);
  for (int p = 0; p < size; ++p) {
    const int w = in_world[static_cast<std::size_t>(p)];
    const std::int64_t n = std::int64_t{count[p]} * item;
    if (w == me)
      into.self += n;
    else if (w / open_ranks_per_node == me / open_ranks_per_node)
      into.intra += n;
    else
      into.inter += n;
  }
}

}  // namespace

void start(tally& t, std::int64_t row_bytes, int ranks_per_node) {
  open_tally = &t;
  open_row_bytes = row_bytes;
  open_ranks_per_node = ranks_per_node;
}

void stop() { open_tally = nullptr; }

}  // namespace ep::meter

extern "C" int MPI_Alltoallv(const void* sendbuf, const int sendcounts[], const int sdispls[], MPI_Datatype sendtype,
                             void* recvbuf, const int recvcounts[], const int rdispls[], MPI_Datatype recvtype,
                             MPI_Comm comm) {
  using namespace ep::meter;
  if (open_tally != nullptr) {
    int item = 0;
    PMPI_Type_size(sendtype, &item);
    add(item == open_row_bytes ? open_tally->rows : open_tally->metadata, sendcounts, sendtype, comm);
  }
  return PMPI_Alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm);
}

extern "C" int MPI_Alltoall(const void* sendbuf, int sendcount, MPI_Datatype sendtype, void* recvbuf, int recvcount,
                            MPI_Datatype recvtype, MPI_Comm comm) {
  using namespace ep::meter;
  if (open_tally != nullptr) {
    int size = 0;
    PMPI_Comm_size(comm, &size);
    const std::vector<int> each(static_cast<std::size_t>(size), sendcount);
    add(open_tally->counts, each.data(), sendtype, comm);
  }
  return PMPI_Alltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm);
}

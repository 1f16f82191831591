#pragma once

// Bytes this rank hands to MPI_Alltoallv / MPI_Alltoall while a tally is open, split by where each
// peer is (itself, a rank of its node, another node). meter.cpp wraps the two calls through MPI's
// profiling interface (PMPI), so what is counted is what the transport was asked to move, not a model
// of it: main.cpp compares it with dist::traffic's model.

#include <cstdint>

namespace ep::meter {

struct bytes {
  std::int64_t self = 0, intra = 0, inter = 0;  // to itself, to its node, to another node
};

struct tally {
  bytes rows;      // MPI_Alltoallv of a datatype of exactly row_bytes (token rows)
  bytes metadata;  // other MPI_Alltoallv (the 16-byte routed_assignment of a dropless dispatch)
  bytes counts;    // MPI_Alltoall (per-peer counts)
};

// Counts into t until stop(); ranks_per_node maps MPI_COMM_WORLD ranks to nodes (rank / P).
void start(tally& t, std::int64_t row_bytes, int ranks_per_node);
void stop();

}  // namespace ep::meter

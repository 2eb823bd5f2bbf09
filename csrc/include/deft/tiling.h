// Tile configuration chosen by deft_jax/tiling.py and passed to the native code as FFI attributes.
// Plain data: no XLA, no CUDA types.
#pragma once

#include <cstdint>

namespace deft {

// The forward kernel a tile names: the streaming kernel (forward.cuh), the split forward (tile_k
// input channels resident per block, forward.cuh) or the warp-specialized ring (forward_ws.cuh).
// The tile's other fields are that family's parameters; the launchers check them against it.
enum TileFamily : int64_t { kFamilyStreaming = 0, kFamilySplit = 1, kFamilyRing = 2 };

struct TileConfig {
  int64_t tile_h;  // output rows of one spatial tile (BM = tile_h * tile_w pixels)
  int64_t tile_w;  // output columns of one spatial tile
  int64_t tile_n;  // output channels per block (BN)
  int64_t tile_k;  // reduction chunk of input channels (BK)
  int64_t warps;   // warps per block (GPU)
  int64_t stages;  // pipeline depth (GPU)
  int64_t bwd_tile_n;  // output channels per block of the backward weight pass (GPU: 64 or 128)
  int64_t k_splits;    // blocks (one cluster) that split the forward's reduction of one tile (GPU)
  int64_t family;      // TileFamily of the forward (GPU)

  int64_t pixels() const { return tile_h * tile_w; }
};

}  // namespace deft

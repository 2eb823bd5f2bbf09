// The words for cuda/launch.h's tile check: "" if the kernels instantiate the tile for the dtype,
// else what they do instantiate. Built here, by the host compiler, from the code that the
// nvcc-compiled side returns (launch.h says why).
#pragma once

#include <string>

#include "cuda/launch.h"
#include "deft/dtype.h"
#include "deft/tiling.h"

namespace deft_ffi {

inline std::string GpuTileError(const deft::TileConfig& tile, deft::DType dtype) {
  const deft::TileCheck check = deft::CheckGpuTileConfig(tile, dtype);
  const bool f64 = dtype == deft::DType::kF64;
  const std::string dt = deft::dtype_name(dtype);
  if (check == deft::kTileBackward)
    return "GPU tile configuration: bwd_tile_n=" + std::to_string(tile.bwd_tile_n) + " is not instantiated for " +
           dt + "; instantiated: 64" + (f64 ? "" : " or 128");
  if (check == deft::kTileOk) return "";
  static const char* const kFamilies[] = {"streaming", "split", "ring"};
  const bool named = tile.family >= 0 && tile.family <= 2;
  std::string s = "GPU tile configuration (family=" + std::string(named ? kFamilies[tile.family] : "?") + " (" +
                  std::to_string(tile.family) + "), tile_h=" + std::to_string(tile.tile_h) +
                  ", tile_w=" + std::to_string(tile.tile_w) + ", tile_n=" + std::to_string(tile.tile_n) +
                  ", tile_k=" + std::to_string(tile.tile_k) + ", warps=" + std::to_string(tile.warps) +
                  ", stages=" + std::to_string(tile.stages) + ", k_splits=" + std::to_string(tile.k_splits) +
                  ") is not instantiated for " + dt +
                  "; instantiated: family streaming (0): tile_h*tile_w=64, tile_n=64, warps=4";
  if (!f64) s += "; tile_h*tile_w=128, tile_n=64, warps=4; tile_h*tile_w=128, tile_n=128, warps=8 or 16";
  s += ", all with tile_k=32, stages 1 or 2, k_splits=1";
  if (!f64)
    s += "; family split (1): tile_h*tile_w=64, tile_n=64, warps=4, stages=2, tile_k in {128, 256, 512}, "
         "k_splits=1; family ring (2, the warp-specialized forward): tile_k=32, warps=8, stages=3, "
         "(tile_h*tile_w, tile_n) = (128, 128), (64, 64) or (64, 128) and k_splits in {1, 2, 4} (2 and 4: "
         "thread-block clusters, compute capability 9.0+)";
  return s;
}

}  // namespace deft_ffi

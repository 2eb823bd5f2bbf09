# The CUDA module: kernels (no XLA) + FFI handlers + nanobind registrations.
# Decided before enable_language(CUDA): afterwards CMake has filled in the compiler's default
# (sm_75 for nvcc 13), which has no bf16 tensor cores.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  # SASS for Ampere and Hopper, PTX of sm_90 for newer chips.
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
file(GLOB DEFT_CUDA_KERNELS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
nanobind_add_module(_deft_cuda NB_STATIC csrc/ffi/gpu_ffi.cc ${DEFT_CUDA_KERNELS})
target_include_directories(_deft_cuda PRIVATE ${DEFT_INCLUDE} ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
# XLA's FFI headers as system headers: their own -Wextra warnings are not ours to fix.
target_include_directories(_deft_cuda SYSTEM PRIVATE ${XLA_FFI_INCLUDE})
target_link_libraries(_deft_cuda PRIVATE CUDA::cudart_static)
set_target_properties(_deft_cuda PROPERTIES CUDA_SEPARABLE_COMPILATION OFF CUDA_VISIBILITY_PRESET hidden)
target_compile_options(_deft_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3 -Xcompiler=-Wall -Werror=all-warnings>
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -O3>)
install(TARGETS _deft_cuda LIBRARY DESTINATION deft_jax)

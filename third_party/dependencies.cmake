# Finds the dependencies installed from package registries (see README):
#   oneDNN v3  PyPI onednn-devel-cpu-gomp (headers + CMake config in the venv)
#   Xbyak      Debian libxbyak-dev (header only)
#   OpenMP     the compiler's (GNU libgomp, the runtime torch and oneDNN use too)
#   GoogleTest Debian libgtest-dev (tests only)
#   pybind11   PyPI (Python module only)

# The venv that holds oneDNN: the active one, or the Python running the build.
if(DEFINED ENV{VIRTUAL_ENV})
  list(APPEND CMAKE_PREFIX_PATH "$ENV{VIRTUAL_ENV}")
endif()
find_package(Python COMPONENTS Interpreter QUIET)
if(Python_EXECUTABLE)
  execute_process(COMMAND ${Python_EXECUTABLE} -c "import sys; print(sys.prefix)"
    OUTPUT_VARIABLE _qsp_py_prefix OUTPUT_STRIP_TRAILING_WHITESPACE)
  list(APPEND CMAKE_PREFIX_PATH "${_qsp_py_prefix}")
endif()

find_package(dnnl 3.0 CONFIG)
if(NOT dnnl_FOUND)
  message(FATAL_ERROR "oneDNN v3 not found: pip install onednn-devel-cpu-gomp==2023.2.0 "
    "into the active virtualenv (scripts/setup.sh does this), or set CMAKE_PREFIX_PATH")
endif()
get_target_property(_qsp_dnnl_lib DNNL::dnnl IMPORTED_LOCATION_RELEASE)
get_filename_component(QSP_DNNL_LIBDIR "${_qsp_dnnl_lib}" DIRECTORY)
message(STATUS "qsparseprop: oneDNN ${dnnl_VERSION} at ${QSP_DNNL_LIBDIR}")

find_path(QSP_XBYAK_INCLUDE_DIR xbyak/xbyak.h)
if(NOT QSP_XBYAK_INCLUDE_DIR)
  message(FATAL_ERROR "Xbyak not found: apt-get install libxbyak-dev")
endif()
add_library(qsp_xbyak INTERFACE)
target_include_directories(qsp_xbyak SYSTEM INTERFACE ${QSP_XBYAK_INCLUDE_DIR})

find_package(OpenMP REQUIRED COMPONENTS CXX)

if(QSP_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
if(QSP_BUILD_PYTHON)
  find_package(Python COMPONENTS Interpreter Development.Module REQUIRED)
  execute_process(COMMAND ${Python_EXECUTABLE} -m pybind11 --cmakedir
    OUTPUT_VARIABLE _qsp_pybind11_dir OUTPUT_STRIP_TRAILING_WHITESPACE)
  find_package(pybind11 CONFIG REQUIRED HINTS "${_qsp_pybind11_dir}")
endif()

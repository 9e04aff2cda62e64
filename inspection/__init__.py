"""One frame's inspection, without the service around it: tiling -> (batched) engine calls -> fusion ->
verdict. The daemon's workers, ``edge-inspect predict``, the trainer's calibration and the benchmarks all
import this package, so a frame is scored the same way everywhere."""

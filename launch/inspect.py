r"""Print every parameter of a checkpoint: path, shape, dtype, layer, component, role, sharding.

  python -m launch.inspect --checkpoint third_party/stories260k/hf --mesh data:1,fsdp:-1
  python -m launch.inspect --checkpoint minilm --json /tmp/minilm.json
  python -m launch.inspect --checkpoint smollm2      # a llama.cpp GGUF file (Q4_1), dequantized
  python -m launch.inspect --checkpoint gemma3       # Gemma-3-270M, Q4_K_M GGUF (Gemma Terms of Use)
"""

from absl import flags

from launch import common
from wa import models, parallel, report, runs
from wa.data import paths
from wa.models import summary

flags.DEFINE_string("checkpoint", None,
                    "Checkpoint directory, .gguf file, or 'stories260k' / 'minilm' / 'smollm2' / 'gemma3'.")
flags.DEFINE_string("mesh", "data:1,fsdp:-1", "Mesh axes, e.g. data:2,fsdp:4; -1 = the rest.")
flags.DEFINE_string("json", None, "Also write the rows and totals to this JSON file.")
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.json:
        runs.output_file(FLAGS.json, "json")
    parallel.mesh.parse_axes(FLAGS.mesh)
    common.start()
    loaded = models.load(paths.checkpoint(FLAGS.checkpoint), mesh=FLAGS.mesh)
    rows = summary.param_rows(loaded)
    tot = summary.totals(rows)
    if common.is_chief():
        print(summary.format_table(rows, tot))
        if loaded.quantization:
            print("stored quantized, read dequantized to float32: " + ", ".join(
                f"{k} {v['tensors']} tensors / {v['weights']:,} weights" for k, v in loaded.quantization.items()))
        if loaded.licence:
            print(f"weights licence (from the file): {loaded.licence}")
        if FLAGS.json:
            report.write_json(FLAGS.json, {"checkpoint": loaded.path, "model_type": loaded.config.model_type,
                                           "mesh": dict(loaded.mesh.shape), "rows": rows, "totals": tot,
                                           "quantization": loaded.quantization})


if __name__ == "__main__":
    common.run(main)

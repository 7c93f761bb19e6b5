"""A GGUF's metadata without its tensors: the tokenizer and chat template alone (1.8 MB of SmolLM2's 98 MB).

python scripts/device/tokenizer_gguf.py SOURCE.gguf DEST.gguf   (scripts/device/prepare.sh runs it)
"""

import sys

from gguf import GGUFReader, GGUFValueType, GGUFWriter

source, dest = sys.argv[1], sys.argv[2]
reader = GGUFReader(source)
writer = GGUFWriter(dest, reader.fields["general.architecture"].contents())
for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":  # the writer sets these itself
        continue
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(name, field.contents(), kind)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()

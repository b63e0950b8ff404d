"""Remote code that llada_train ships in an export whose source directory had none.

`configuration_llada2_moe.py` and `modeling_llada2_moe.py` are copied, as files, next to the
weights of such an export (`model.io.save_pretrained`), under the file and class names of the
official `auto_map`, so that `AutoConfig` / `AutoModelForCausalLM.from_pretrained(export,
trust_remote_code=True)` load it as they load a release. They are not imported from here.
"""

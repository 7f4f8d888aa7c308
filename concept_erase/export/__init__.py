"""What an erasure becomes and where it is used: the delta file with apply() (`delta`), the diffusers folder, LoRA
and single-file exports (`formats`), the LoRA key forms (`lora_forms`), which tensors each program applies
(`loaders`) and the model card (`model_card`). The single-file key layouts the families name are `io.single_file`."""

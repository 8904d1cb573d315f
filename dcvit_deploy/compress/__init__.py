"""DC-ViT compression engine: accounting, planning, surgery, metric set, selection of blocks by
recoverability, progressive feature-mimicking finetuning, dense families and the PRACTISE
baseline. See ``docs`` in the README for the method and its settings."""

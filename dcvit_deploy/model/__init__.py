"""The model and its images: timm loading (:mod:`.loading`) and the few-shot image set
(:mod:`.images`)."""

"""What diffusers' and kohya's training flags mean in sdlite: the tables training/foreign_flags.py reads.

A flag is renamed (its value kept), a switch (it takes no value and sets ours), refused (naming what
to use instead, or saying that sdlite lacks the behaviour yet), or read by a function of
foreign_flags.py (its value needs reading: ``--network_dim``, ``--resolution W,H``, epochs). Where
sdlite behaves differently from the flag's tool, ``NOTES`` says how, printed once when it is given.
"""

# Their flag -> our key, the value as it is.
RENAMED = {
    "pretrained_model_name_or_path": "pretrained",
    "pretrained_vae_model_name_or_path": "vae_path",
    "max_train_steps": "max_steps",
    "checkpointing_steps": "checkpoint_every",
    "save_every_n_steps": "checkpoint_every",
    "rank": "lora_rank",
    "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "proportion_empty_prompts": "caption_dropout",
    "caption_dropout_rate": "caption_dropout",
    "min_snr_gamma": "snr_gamma",
    "min_bucket_reso": "bucket_min_side",
    "max_bucket_reso": "bucket_max_side",
    "bucket_reso_steps": "bucket_step",
    "sample_prompts": "validation_prompts_file",
    "sample_every_n_steps": "validation_every",
    "log_with": "report_to",
    "max_data_loader_n_workers": "dataloader_num_workers",
}
# Their switches (no value) -> our settings; an empty dict: what sdlite always does.
SWITCHES: dict[str, dict[str, str]] = {
    "center_crop": {"random_crop": "false"},
    "use_ema": {"ema_decay": "0.9999"},
    "enable_bucket": {"aspect_buckets": "true"},
    "flip_aug": {"random_flip": "true"},
    "network_train_unet_only": {"lora_text_encoder": "false"},
    "v_parameterization": {"prediction_type": "v_prediction"},
    "zero_terminal_snr": {"rescale_betas_zero_snr": "true"},
    "fp8_base": {"lora_base_dtype": "fp8"},
    "with_prior_preservation": {},
    "enable_xformers_memory_efficient_attention": {},
    "xformers": {},
    "sdpa": {},
    "cache_latents": {},
    "cache_latents_to_disk": {},
    "pre_compute_text_embeddings": {},
    "save_state": {},
}
# How sdlite differs where a flag is read: said once, when the flag is given.
NOTES = {
    "resume_from_checkpoint": "sdlite's resume is exact: the data order, noise and schedule go on as if "
    "uninterrupted",
    "resume": "sdlite's resume is exact: the data order, noise and schedule go on as if uninterrupted",
    "enable_xformers_memory_efficient_attention": "attention already runs torch's fused SDPA kernels",
    "xformers": "attention already runs torch's fused SDPA kernels",
    "with_prior_preservation": "sdlite keeps the class prior whenever --class_data_dir is given",
    "cache_latents": "sdlite caches latents on disk by default (--cache_latents)",
    "cache_latents_to_disk": "sdlite caches latents on disk by default (--cache_latents)",
    "save_state": "every sdlite checkpoint holds the full training state",
    "validation_epochs": "sdlite counts optimizer steps, not epochs",
    "num_train_epochs": "sdlite counts optimizer steps, not epochs",
    "max_train_epochs": "sdlite counts optimizer steps, not epochs",
    "network_dim": "kohya trains the text encoder's LoRA too unless --network_train_unet_only; sdlite "
    "only with --lora_text_encoder true",
    "diffusers_crop": "diffusers' scripts crop at random unless --center_crop; sdlite crops at the centre "
    "unless --random_crop true",
}
# Their flag -> what to use instead (sdlite has no equivalent).
REFUSED = {
    "dataset_name": "give --train_data_dir (a local folder or file: sdlite downloads nothing)",
    "dataset_config_name": "give --train_data_dir (a local folder or file: sdlite downloads nothing)",
    "revision": "give --pretrained a local folder holding the revision you want",
    "variant": "give --pretrained a local folder holding the weights you want",
    "logging_dir": "logs always go to output_dir/logs",
    "scale_lr": "set --learning_rate to the rate you want",
    "push_to_hub": "sdlite uploads nothing; upload the final folder with huggingface_hub if you wish",
    "hub_token": "sdlite uploads nothing",
    "hub_model_id": "sdlite uploads nothing",
    "max_train_samples": "give a train_data_dir holding the images you want",
    "num_validation_images": "each validation prompt gives one image: repeat a prompt for more",
    "reg_data_dir": "give --class_data_dir and --class_prompt (DreamBooth class images)",
    "save_precision": "LoRA weights are saved in float32",
    "network_weights": "sdlite starts a LoRA from zero; merge the old one into --pretrained first",
    "save_every_n_epochs": "give --checkpoint_every (in optimizer steps)",
    "sample_every_n_epochs": "give --validation_every (in optimizer steps)",
    "lr_num_cycles": "not supported: use --lr_scheduler cosine",
    "lr_power": "not supported: use --lr_scheduler polynomial with its default power",
    "non_ema_revision": "give --pretrained a local folder holding the weights you want",
    "network_args": "LoRA variants are not supported: sdlite trains plain LoRA (--lora_target_modules picks "
    "the modules)",
    "network_train_text_encoder_only": "sdlite's LoRA always adapts the U-Net",
    "optimizer_args": "sdlite's AdamW takes --adam_beta1, --adam_beta2, --adam_weight_decay, --adam_epsilon",
    "clip_skip": "not supported: the text encoder's last layer is used",
    "v2": "give --pretrained a diffusers-layout folder: its config says what model it is",
    "full_fp16": "give --mixed_precision fp16 (the trained weights stay fp32)",
    "full_bf16": "give --mixed_precision bf16 (the trained weights stay fp32)",
    "persistent_data_loader_workers": "not supported: workers start once an epoch",
    "color_aug": "not supported: colours are kept as they are",
    "max_token_length": "not supported: prompts are cut at the text encoder's length",
    "in_json": "give --train_data_dir a folder with metadata.jsonl, or captions beside the images",
}
LORA_MODULES = ("networks.lora",)
SAFE_FORMATS = {"safetensors": "kohya", "diffusers": "diffusers"}  # kohya's --save_model_as -> ours
# Flags of diffusers' scripts that kohya's do not share: a command line holding one is diffusers'.
DIFFUSERS_ONLY = {"checkpointing_steps", "validation_prompt", "rank", "use_ema",
                  "proportion_empty_prompts", "pretrained_vae_model_name_or_path", "num_train_epochs",
                  "validation_epochs", "resume_from_checkpoint"}  # fmt: skip

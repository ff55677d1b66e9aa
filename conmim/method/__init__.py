"""The method: the encoder and classifier (:mod:`.vit`), the projector (:mod:`.heads`), the
momentum encoder (:mod:`.momentum`), the denoising contrastive loss (:mod:`.objective`) and the
ConMIM module that joins them (:mod:`.conmim`). Plain typed arguments; no config objects."""

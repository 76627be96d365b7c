"""TFDS builder for the RSNA Pediatric Bone Age release, and the phantom radiograph generator.

Importing this package registers the ``rsna_bone_age`` builder with TFDS.
"""

from tfds_rsna.rsna_bone_age import RsnaBoneAge, RsnaFormatError, find_splits

__all__ = ["RsnaBoneAge", "RsnaFormatError", "find_splits"]

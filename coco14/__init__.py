"""MS-COCO 2014 for RRM: layout, class names, data sets, preparation from the files COCO ships."""
